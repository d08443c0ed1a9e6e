"""DVC stage report: one self-contained HTML page over the pipeline's metrics and outputs.

Writes paths.reports/index.html (images embedded as data URIs).
Run: python -m stages.report
"""

from semilens.report import build_report
from semilens.stage_runner import run_stage

if __name__ == "__main__":
    run_stage("report", build_report)
