"""actionft: LoRA fine-tuning of Gemma 4 to name the action in short video clips."""

__version__ = "0.1.0"

# The question the reference Kinetics-3K run asks of every clip.
DEFAULT_PROMPT = (
    "Please analyze the sequence of frames from this video. What specific action or event is happening?"
)

# Known harmless library messages are filtered before any library that prints them is imported (actionft.quiet).
from actionft import quiet as _quiet  # noqa: E402

_quiet.install()
