"""What a transformed module runs besides the model's own ops: the request checks
(:mod:`.checks`), :class:`SplitLinear` (:mod:`.modules`), and the plain attribute paths
its forward reaches submodules through (:mod:`.paths`)."""
from .checks import (GRAPH_FUNCTIONS, Retracer, check_inference, check_request, check_request_op,
                     graph_function)
from .modules import SplitLinear, SplitSource
from .paths import BoundGraphModule, bind_paths

__all__ = ["BoundGraphModule", "GRAPH_FUNCTIONS", "Retracer", "SplitLinear", "SplitSource", "check_inference", "check_request",
           "bind_paths", "check_request_op", "graph_function"]
