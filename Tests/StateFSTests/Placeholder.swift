import Testing
@testable import StateFS
