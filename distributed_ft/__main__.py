"""`python -m distributed_ft ...`: the `dft` command line."""
if __name__ == "__main__":  # guarded: worker processes (grader metrics) re-import the main module
    from distributed_ft.cli import run

    run()
