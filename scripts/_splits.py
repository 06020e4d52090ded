"""How the benchmarks split each config's blocks over nodes: config -> node count -> spans
``[(start, end), ...]``. The 2-node split is the one the swarm's goals are stated for."""

SPLITS = {
    "tiny": {2: [(0, 4), (4, 8)], 3: [(0, 3), (3, 6), (6, 8)]},
    "small": {2: [(0, 8), (8, 16)], 3: [(0, 6), (6, 11), (11, 16)]},
    "smollm2": {2: [(0, 15), (15, 30)], 3: [(0, 10), (10, 20), (20, 30)]},
}
