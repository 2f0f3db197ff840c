"""noports: SSH No Ports in Python."""
