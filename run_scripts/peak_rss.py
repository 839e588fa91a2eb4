"""peak_rss.py OUT_FILE cmd args... : run cmd, write the peak RSS (MB) of its largest process."""
import resource, subprocess, sys

rc = subprocess.call(sys.argv[2:])
mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
with open(sys.argv[1], "w") as f:
    f.write(f"{mb:.1f}\n")
sys.exit(rc)
