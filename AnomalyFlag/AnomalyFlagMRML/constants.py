"""Names the bridge and the module share: node attributes, references and roles, the heatmap colour table and
the device choices. Those the library also uses are imported from it, not repeated."""

from AnomalyFlagLib.config import METADATA_FILE as MODEL_METADATA_FILE  # noqa: F401 - for the module
from AnomalyFlagLib.devices import DEVICE_CHOICES  # noqa: F401 - for the module
from AnomalyFlagLib.io.scored_case import HEATMAP_SCALE_KEY  # noqa: F401 - for review.py
from AnomalyFlagLib.results import HEATMAP_DISPLAY_MAX as DISPLAY_MAX_INDEX  # noqa: F401 - for heatmap.py
from AnomalyFlagLib.results import HEATMAP_UNITS  # noqa: F401 - for heatmap.py

# Node attributes
ATTR_CASE = "AnomalyFlag.Case"
ATTR_ROLE = "AnomalyFlag.Role"
ATTR_MODEL = "AnomalyFlag.Model"
ATTR_FINGERPRINT = "AnomalyFlag.ModelFingerprint"
ATTR_THRESHOLD = "AnomalyFlag.Threshold"
ATTR_SCALE = "AnomalyFlag.HeatmapScale"
ATTR_UNITS = "AnomalyFlag.HeatmapUnits"
ATTR_SERIES = "AnomalyFlag.Series"
ATTR_SIDECAR = "AnomalyFlag.ReviewSidecar"
ATTR_PROGRESS = "AnomalyFlag.ReviewProgress"
ATTR_SAVED_VERSION = "AnomalyFlag.SavedVersion"

# Values of ATTR_ROLE
ROLE_HEATMAP = "heatmap"
ROLE_SCORES = "scores"
ROLE_CHART = "chart"
ROLE_CHART_DATA = "chart data"
ROLE_REVIEW = "review"

# Node references
INPUT_VOLUME_REFERENCE = "AnomalyFlag.InputVolume"
SCORE_TABLE_REFERENCE = "AnomalyFlag.ScoreTable"
CHART_REFERENCE = "AnomalyFlag.Chart"
CHART_DATA_REFERENCE = "AnomalyFlag.ChartData"
SEGMENTATION_REFERENCE = "AnomalyFlag.Segmentation"

# The heatmap colour table (its colours: AnomalyFlagLib.results.heatmap_colours, shared with the montage)
COLOR_NODE_NAME = "AnomalyFlagHeatmap"
