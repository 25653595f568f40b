"""voxflow's Airflow operators, triggers and DAG factory.

An installed package (the triggerer cannot load code from the DAG folder). Operators are
thin: they call the voxflow core library, which never imports Airflow.
"""
