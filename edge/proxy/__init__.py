"""The proxied path, glued from the packages below it: the handler, one Exchange per request,
the request's classification (route), what goes upstream (outbound), the attempts (forward) and
the relay of the answer."""
