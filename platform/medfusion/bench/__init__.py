"""`medfusion bench <ingest|train|tune|serve>`: this system and its plain baseline, side by side.

Each module holds one benchmark's config (`<Name>BenchConfig`) and its `run_<name>_bench` function,
which prints a table and returns the JSON record the CLI prints last. Benchmarks are entry points
(the CLI calls them): they may import anything, including the Serve app in `medfusion.serve`;
nothing in the library imports them.
"""
