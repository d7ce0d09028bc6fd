// Graph IR: leaves, shape rules at build time, topological order, pruning, cycles, DOT.
#include <gtest/gtest.h>

#include "dagrad.hpp"

namespace dagrad {
namespace {

TEST(Graph, ShapeMismatchIsReportedWhenTheNodeIsAdded) {
  Graph g;
  Value a = g.input("a", {3, 4});
  Value b = g.input("b", {5});
  try {
    add(a, b);
    FAIL() << "no error";
  } catch (const ShapeError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("add \"add\""), std::string::npos) << message;  // op and node
    EXPECT_NE(message.find("[3,4]"), std::string::npos) << message;
    EXPECT_NE(message.find("[5]"), std::string::npos) << message;
    EXPECT_NE(message.find("test_graph.cpp"), std::string::npos) << message;  // the user's line
  }
}

TEST(Graph, DtypeMismatchNamesBothDescs) {
  Graph g;
  Value a = g.input("a", {2}, DType::f32);
  Value b = g.input("b", {2}, DType::f64);
  EXPECT_THROW(
      {
        try {
          mul(a, b);
        } catch (const ShapeError& e) {
          EXPECT_NE(std::string(e.what()).find("f32[2] and f64[2]"), std::string::npos) << e.what();
          throw;
        }
      },
      ShapeError);
}

TEST(Graph, ValuesOfAnotherGraphAreRefused) {
  Graph g1, g2;
  Value a = g1.input("a", {2});
  Value b = g2.input("b", {2});
  EXPECT_THROW(add(a, b), GraphError);
}

TEST(Graph, DuplicateInputNamesAreRefused) {
  Graph g;
  g.input("x", {2});
  EXPECT_THROW(g.input("x", {3}), GraphError);
}

TEST(Graph, UnknownOpIsAGraphError) {
  Graph g;
  Value a = g.input("a", {2});
  EXPECT_THROW(g.apply("no_such_op", {a}), GraphError);
}

TEST(Graph, TopologicalOrderPutsProducersFirst) {
  Graph g;
  Value x = g.input("x", {2});
  Value y = exp(x);
  Value z = add(y, x);
  auto order = g.topological_order();
  auto position = [&](NodeId id) {
    return std::find(order.begin(), order.end(), id) - order.begin();
  };
  EXPECT_LT(position(x.node_id()), position(y.node_id()));
  EXPECT_LT(position(y.node_id()), position(z.node_id()));
}

TEST(Graph, PruneKeepsOnlyWhatTheOutputsNeed) {
  Graph g;
  Value x = g.input("x", {2});
  Value unused = g.input("unused", {2});
  Value y = exp(x);
  Value dead = log(unused);
  std::vector<Value> outs{y};
  auto kept = g.prune(outs);
  EXPECT_EQ(kept.size(), 2u);
  EXPECT_EQ(std::count(kept.begin(), kept.end(), dead.node_id()), 0);
}

TEST(Graph, RewiringThatWouldCreateACycleIsRefused) {
  Graph g;
  Value x = g.input("x", {2});
  Value y = exp(x);
  Value z = neg(y);
  // Feeding z back into y's input would make y depend on itself.
  try {
    g.set_input(y.node_id(), 0, z);
    FAIL() << "no error";
  } catch (const GraphError& e) {
    EXPECT_NE(std::string(e.what()).find("cycle"), std::string::npos) << e.what();
  }
  // A legal rewire works and the order follows it.
  Value w = g.input("w", {2});
  g.set_input(y.node_id(), 0, w);
  std::vector<Value> outs{z};
  auto kept = g.prune(outs);
  EXPECT_EQ(std::count(kept.begin(), kept.end(), x.node_id()), 0);
  EXPECT_EQ(std::count(kept.begin(), kept.end(), w.node_id()), 1);
}

TEST(Graph, DotExportShowsNodesShapesAndGradientNodes) {
  Graph g;
  Value x = g.input("x", {2, 3});
  Value w = g.parameter("w", Tensor::full({2, 3}, 0.5));
  Value loss = sum(mul(x, w));
  auto grads = grad(loss, {w});
  std::vector<Value> outs{loss, grads[0]};
  std::string dot = g.to_dot(outs);
  EXPECT_NE(dot.find("digraph"), std::string::npos);
  EXPECT_NE(dot.find("f32[2,3]"), std::string::npos);
  EXPECT_NE(dot.find("grad/"), std::string::npos);    // gradient nodes are named apart
  EXPECT_NE(dot.find("#fde2c8"), std::string::npos);  // and coloured apart
}

TEST(Graph, NameScopesPrefixNodeNames) {
  Graph g;
  Value x = g.input("x", {2});
  Value y;
  {
    Graph::NameScope scope(g, "fc1");
    y = exp(x);
  }
  EXPECT_EQ(y.node().name, "fc1/exp");
}

TEST(Tensor, FromChecksTheCountAndConverts) {
  Tensor t = Tensor::from({1, 2, 3, 4}, {2, 2});
  EXPECT_EQ(t.at(3), 4.0);
  EXPECT_THROW(Tensor::from({1, 2, 3}, {2, 2}), Error);
  Tensor d = t.to(DType::f64);
  EXPECT_EQ(d.dtype(), DType::f64);
  EXPECT_EQ(d.at(2), 3.0);
  EXPECT_THROW(t.data<double>(), Error);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.raw()) % 64, 0u);
}

// f32 matrices whose rows are a multiple of 4 KiB start 16 bytes past a 64-byte boundary (oneDNN
// SGEMM speed, graph/tensor.cpp); everything else is 64-byte aligned, and the data is intact.
TEST(Tensor, FourKibRowsStartSixteenBytesIn) {
  auto address = [](const Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.raw()); };
  Tensor w = Tensor::full({3, 1024}, 2.5);
  EXPECT_EQ(address(w) % 64, Tensor::row_offset_4k);
  EXPECT_EQ(address(Tensor(Shape{2, 2048}, DType::f32)) % 64, Tensor::row_offset_4k);
  EXPECT_EQ(address(w.clone()) % 64, Tensor::row_offset_4k);
  EXPECT_EQ(w.at(3 * 1024 - 1), 2.5);  // the last element is inside the allocation
  for (const Tensor& t : {Tensor(Shape{1024}, DType::f32), Tensor(Shape{3, 1000}, DType::f32),
                          Tensor(Shape{3, 1024}, DType::f64), Tensor(Shape{3, 512}, DType::f64),
                          Tensor(Shape{3, 1024}, DType::i32)}) {
    EXPECT_EQ(address(t) % 64, 0u) << fmt::format("{}", t.desc());
  }
}

}  // namespace
}  // namespace dagrad
