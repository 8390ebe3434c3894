"""The request path: handle_proxy (steps 0-12), the attempt loop, Policy and Services."""
