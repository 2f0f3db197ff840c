"""Pure (sans-IO) atProtocol logic: command grammar, key rules, metadata, errors, formats."""
