"""What a request is: authentication, classification (ProxyCall), agent-loop detection."""
