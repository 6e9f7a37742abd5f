"""Serving on Ray Serve: a FastAPI ingress and a batched model deployment (see :mod:`jointray.serve.app`)."""
