"""Settings, the `climber` command line and the wiring of the closed loop."""
