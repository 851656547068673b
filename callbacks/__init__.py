"""Lightning callbacks shipped as ``freemerge_pl.callbacks``."""

from freemerge_pl.callbacks.analysis import SpectrumAnalysis
from freemerge_pl.callbacks.export import ExportMerged
from freemerge_pl.callbacks.progress import LineProgressBar
from freemerge_pl.callbacks.results import ResultsTable, results_markdown
from freemerge_pl.callbacks.routing import RoutingStats

__all__ = ["ExportMerged", "LineProgressBar", "ResultsTable", "RoutingStats", "SpectrumAnalysis", "results_markdown"]
