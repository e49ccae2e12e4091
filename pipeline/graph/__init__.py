"""The Beam graph of a run: the manifest's read, the fetch, a rerun's reconcile, the tables' files and the last
steps, with the settings they take. Imports pipeline.core, pipeline.service and pipeline.dataset."""
