"""atServer: hosts one or many atSigns, each on its own TLS port."""
