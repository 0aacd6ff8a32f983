"""Real Flower deployment on one machine: certificates, node keys, data shards, SuperLink and SuperNodes."""
