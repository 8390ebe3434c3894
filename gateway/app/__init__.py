"""The aiohttp application: routes and error boundary, the Gateway object, admin and deferred endpoints."""
