"""The application layer: the command line, the simulation driver, the Ray engine, the ServerApp, deployment.

It sits above the platform core (`fedpeft.*`) and the methods (`strategies`, `clients`); nothing below imports it.
"""
