"""circuitlab.graphs"""
