"""After lowering: what was done (:mod:`.record`), whether it is right (:mod:`.verify`, :mod:`.audit`)
and whether it pays off (:mod:`.flops`, the report of :mod:`.build` behind ``mari-fx report``)."""
from .build import SCHEMA, build_report, item_cache_report, report

__all__ = ["SCHEMA", "build_report", "item_cache_report", "report"]
