"""allconv's Hydra launchers (Hydra looks for launcher classes under hydra_plugins)."""
