"""atDirectory (root server): maps atSigns to atServer host:port."""
