"""Checked-in YAML: size presets (`presets/<tiny|small|base>.yaml`, applied by
`medfusion.loader.apply_preset`) and shipped search spaces (`search_spaces/*.yaml`). Data only."""
