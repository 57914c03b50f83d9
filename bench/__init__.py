"""The mari_fx benchmark: ``python -m bench.run`` (``make bench``); see docs/bench.md.

* :mod:`bench.models` -- the pair-shaped models (coarse ranker, DIN fine ranker, DCN-v2), neat and fragmented;
* :mod:`bench.handwritten` -- the same models re-parameterized by hand;
* :mod:`bench.torchrec_case` -- the TorchRec example model;
* :mod:`bench.measure` -- interleaved latency, FLOPs, peak memory, op profiles;
* :mod:`bench.report` -- results.md, the target checks, speedup.png;
* :mod:`bench.run` -- the command line.
"""
