"""circuitlab.reports"""
