"""The tba application: the command line, the supervised job (`tba run`), its live view, reports,
inspection and the demo. The top layer: it wires the roles together and nothing imports it."""
