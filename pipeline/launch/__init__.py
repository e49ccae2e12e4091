"""The commands: argument parsing and options, the launch-time checks (manifest, output, key, runner), the mode over
an existing dataset, signals, and `run` and `export` themselves. May import every layer below it."""
