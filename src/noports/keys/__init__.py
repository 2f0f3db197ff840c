"""Keys at the edge: .atKeys files, the plane's CA, onboarding and activation."""
