"""Events and how they move: the contract, the in-process bus, and (issue 5) Kafka and Faust."""
