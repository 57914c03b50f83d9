"""What a transformed module runs besides the model's own ops: the request checks
(:mod:`.checks`) and :class:`SplitLinear` (:mod:`.modules`)."""
from .checks import (GRAPH_FUNCTIONS, Retracer, check_inference, check_request, check_request_op,
                     graph_function)
from .modules import SplitLinear, SplitSource

__all__ = ["GRAPH_FUNCTIONS", "Retracer", "SplitLinear", "SplitSource", "check_inference", "check_request",
           "check_request_op", "graph_function"]
