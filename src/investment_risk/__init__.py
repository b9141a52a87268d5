"""investment-risk: eight calibrated capital-preservation risk scores per news article."""

import os
import sys

__version__ = "0.1.0"

# No telemetry from the runtimes this package loads (a pod has no network for it, and a user's data is theirs):
# ONNX Runtime's is off by its switch; OpenVINO's converter and NNCF fall back to their stubs when the
# openvino_telemetry package cannot be imported (both look it up at import time, so this must come first).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
