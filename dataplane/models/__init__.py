"""Model definitions, configs, presets and weight loading; no scheduling or serving policy here."""
