"""Helpers shared by the test suites: start real processes on loopback in temp dirs."""
