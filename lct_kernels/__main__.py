"""`python -m lct_kernels`: print the environment and backend report."""

import sys

from ._backend import backend_info, format_backend_info

if __name__ == "__main__":
    if "--json" in sys.argv[1:]:
        import json

        print(json.dumps(backend_info(), indent=1, default=str))
    else:
        print(format_backend_info())
