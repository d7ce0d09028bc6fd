// dagrad's exception family. Every user mistake and every bad file raises one of
// these with a message that says what went wrong, where, and the values involved.
#pragma once

#include <stdexcept>
#include <string>

namespace dagrad {

// Base of every error dagrad raises on bad input.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// A shape or dtype rule refused its inputs (raised when the node is added).
class ShapeError : public Error {
 public:
  using Error::Error;
};

// The graph itself is wrong: a cycle, a value from another graph, a missing gradient rule.
class GraphError : public Error {
 public:
  using Error::Error;
};

// A feed passed to Plan::run is missing, unknown, or of the wrong dtype or shape.
class FeedError : public Error {
 public:
  using Error::Error;
};

// A file could not be read or written, or its contents are malformed.
class IOError : public Error {
 public:
  using Error::Error;
};

}  // namespace dagrad
