"""Sweep search spaces (`<space>.yaml`) and data profiles (`profiles/<profile>.yaml`), installed as the
package data of `affseg.sweeps`; `affseg.sweep.space` reads them through `importlib.resources`."""
