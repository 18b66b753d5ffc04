"""GPU benchmarks behind ``kvcomp bench``. One module per benchmark (``decode``, ...), each
exposing ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; shared timing,
bandwidth and verification helpers live in ``kvcomp.bench.timing``. Every benchmark verifies its
results against the references before it times anything."""
