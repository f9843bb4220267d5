from calq.export.base import Exporter
