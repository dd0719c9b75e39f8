"""Model and run configurations: presets are functions that return configs."""
