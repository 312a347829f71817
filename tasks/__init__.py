"""circuitlab.tasks"""
