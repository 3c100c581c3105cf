"""``python -m brokers``: run a fog broker, exactly as ``sparse-zmq broker`` does.

Takes the options of ``sparse-zmq broker`` (``python -m brokers --help``).
"""

import sys

from sparse_zmq.cli import main

if __name__ == "__main__":
    sys.exit(main(["broker", *sys.argv[1:]]))
