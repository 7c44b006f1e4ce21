from distributed_ft.cli import run

run()
