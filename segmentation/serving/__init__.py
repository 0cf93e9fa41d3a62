"""Serving past one process: the same API on Ray Serve (`ray_app`, needs requirements-ray.txt) and the
cross-request decode batching its replicas use (`batching`, plain torch). Nothing else imports this package,
so the default install never needs Ray."""
