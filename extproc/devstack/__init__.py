"""The local stack behind `extproc dev`: simulated pods, the server and a real Envoy on loopback."""
