"""Reading finished runs back: tables and plots over run folders (`mmbalance report`)."""

from mmbalance.analysis.report import format_runs_table, summarize, write_report
from mmbalance.analysis.runs import load_runs

__all__ = ["format_runs_table", "load_runs", "summarize", "write_report"]
