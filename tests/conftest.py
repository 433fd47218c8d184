import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# megatron-core warns about missing TE/apex at import; that is the expected CPU set-up.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
