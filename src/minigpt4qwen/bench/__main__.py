"""`python -m minigpt4qwen.bench ...`: the bench without the package CLI."""

import sys

from .cli import main

sys.exit(main())
